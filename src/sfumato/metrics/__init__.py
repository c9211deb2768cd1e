"""Sample-quality measures, each reported next to its floor (the same measure between two
independent real samples of the same size), so a number can be read without a baseline run.

- 2-D toys: :func:`evaluate_2d` (sliced Wasserstein, MMD against fresh ground truth).
- Images: :func:`evaluate_images` (Fréchet distance in a small classifier's feature space, or
  any :class:`FeatureExtractor`'s; class accuracy of conditional samples).
- Building blocks: :func:`frechet_distance`, :func:`mmd`, :func:`get_classifier`,
  :func:`psnr` (per image, for reconstructions).

The classifiers are trained on first use and cached under ``$SFUMATO_CACHE`` (default
``~/.cache/sfumato``): a few seconds for digits, about a minute for MNIST on two CPU cores.
"""

from .classifier import RECIPES, Classifier, SmallCNN, cache_dir, get_classifier, train_classifier
from .frechet import frechet_distance, frechet_from_stats, gaussian_stats
from .images import FeatureExtractor, class_stats, evaluate_images, psnr
from .two_d import DEFAULT_BANDWIDTHS, evaluate_2d, mmd

__all__ = [
    "Classifier",
    "DEFAULT_BANDWIDTHS",
    "FeatureExtractor",
    "RECIPES",
    "SmallCNN",
    "cache_dir",
    "class_stats",
    "evaluate_2d",
    "evaluate_images",
    "frechet_distance",
    "frechet_from_stats",
    "gaussian_stats",
    "get_classifier",
    "mmd",
    "psnr",
    "train_classifier",
]
