"""Latent diffusion runs: training on an autoencoder run's cached latents, sampling decoded
images, editing through the autoencoder, and the clear errors for a missing, wrong or changed
autoencoder and a damaged cache (nothing overwritten)."""

import shutil

import pytest
import torch
from _util import tiny_autoencoder, write_bars

import sfumato
from sfumato.cli import main
from sfumato.errors import ConfigError, DataError, RunReferenceError, UsageError
from sfumato.latent import CACHE_NAME, LatentModel
from sfumato.model import evaluate
from sfumato.run import Run
from sfumato.train.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread_module")

AE = tiny_autoencoder(train={"steps": 30, "batch_size": 32, "checkpoint_every": 0})


def _ldm(ae_dir, **train_cfg):
    return {"data": {"name": "digits"}, "autoencoder": str(ae_dir),
            "model": {"type": "unet", "image_size": 4, "in_channels": 2, "model_channels": 16,
                      "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
                      "norm_groups": 8, "conditional": True},
            "objective": {"sigma_data": 1.0, "label_dropout": 0.1},
            "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "num_threads": 1,
                      **train_cfg},
            "sample": {"n_grid": 8, "steps": 4}}


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "ae"
    train(AE, out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def ldm_dir(ae_dir):
    out = ae_dir.parent / "ldm"
    train(_ldm(ae_dir), out=out, progress=False)
    return out


def test_latent_run_trains_on_the_autoencoders_scaled_latents(ae_dir, ldm_dir):
    run = Run(ldm_dir)
    assert run.kind == "latent"
    assert run.data_shape == (2, 4, 4) and run.state["image_shape"] == [1, 8, 8]
    ref = run.refs["autoencoder"]
    assert ref.path == "../ae" and ref.sha256 == Run(ae_dir).weights_sha256()
    ae = sfumato.load(ae_dir)
    data = sfumato.data.get_dataset({"name": "digits"})
    cached = Trainer(_ldm(ae_dir), ldm_dir, progress=False).x_train
    assert torch.equal(cached, ae.encode(data.train))          # the cache is the encoding
    assert float(cached.std()) == pytest.approx(1.0, abs=0.05)  # at unit scale


def test_latent_model_samples_decoded_images_and_edits_through_the_autoencoder(ldm_dir):
    m = sfumato.load(ldm_dir)
    assert isinstance(m, LatentModel)
    assert m.shape == (2, 4, 4) and m.image_shape == (1, 8, 8)
    out = m.sample(6, steps=3, guidance=2.0, seed=3)
    assert out.x.shape == (6, 1, 8, 8) and out.latents.shape == (6, 2, 4, 4)
    assert torch.equal(out.x, m.autoencoder.decode(out.latents))
    assert out.x.abs().max() <= 1.0
    again = m.sample(6, steps=3, guidance=2.0, seed=3)
    assert torch.equal(again.x, out.x)
    # inversion in latent space reproduces the sampled latents (sampler heun, exact solve)
    noise = m.invert(out.x, steps=3, class_labels=out.labels, guidance=2.0)
    back = m.sample(6, steps=3, guidance=2.0, class_labels=out.labels, noise=noise)
    enc = m.autoencoder.encode(out.x)
    assert (back.latents - enc).abs().max() < 1e-3
    assert m.edit(out.x, 0.5, steps=3).shape == (6, 1, 8, 8)
    with pytest.raises(UsageError, match="image shape"):
        m.invert(out.latents)
    with pytest.raises(UsageError, match="latent run"):
        m.restore(out.x, None)
    rows = evaluate(ldm_dir, n=50)["rows"]
    assert rows[0]["fd"] > 0 and rows[0]["accuracy"] is not None


def test_cache_is_reused_and_checked(ae_dir, ldm_dir, tmp_path, monkeypatch):
    from sfumato.autoencoder import AutoencoderModel

    def no_encoding(self, x, batch_size=512):
        raise AssertionError("re-encoded although the cache is valid")

    monkeypatch.setattr(AutoencoderModel, "encode", no_encoding)
    Trainer(_ldm(ae_dir), ldm_dir, progress=False)  # reads the cache
    monkeypatch.undo()
    # a damaged cache: a clear error, the file left as it is
    broken = tmp_path / "broken"
    shutil.copytree(ldm_dir, broken)
    (broken / CACHE_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="delete it"):
        Trainer(_ldm(ae_dir), broken, progress=False)
    assert (broken / CACHE_NAME).read_bytes() == b"not a safetensors file"


def test_missing_wrong_and_changed_autoencoders_are_clear_errors(ae_dir, ldm_dir, tmp_path):
    with pytest.raises(RunReferenceError, match="cannot be read"):
        Trainer(_ldm(tmp_path / "nowhere"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="is a latent run"):
        Trainer(_ldm(ldm_dir), tmp_path / "b", progress=False)
    other = {**_ldm(ae_dir), "data": {"name": "digits", "size": 16}}
    with pytest.raises(ConfigError, match="trained on images of shape"):
        Trainer(other, tmp_path / "c", progress=False)
    # retrain the autoencoder in place of the old one: the latent run refuses it
    ae2 = tmp_path / "ae"
    shutil.copytree(ae_dir, ae2)
    ldm2 = tmp_path / "ldm"
    shutil.copytree(ldm_dir, ldm2)
    before = (ldm2 / CACHE_NAME).read_bytes()
    train({**AE, "train": {**AE["train"], "steps": 31}}, out=ae2, progress=False)
    with pytest.raises(RunReferenceError, match="changed since"):
        sfumato.load(ldm2)
    with pytest.raises(RunReferenceError, match="another autoencoder"):
        Trainer(_ldm(ae2), ldm2, progress=False)
    assert (ldm2 / CACHE_NAME).read_bytes() == before


def test_cli_trains_with_set_autoencoder_and_samples_images(ae_dir, tmp_path, capsys):
    import json

    cfg = tmp_path / "ldm.json"
    spec = _ldm("placeholder")
    del spec["autoencoder"]
    cfg.write_text(json.dumps(spec))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--set", f"autoencoder={ae_dir}", "--out", str(out),
                 "--no-progress"]) == 0
    assert Run(out).kind == "latent"
    assert main(["sample", str(out), "--n", "4", "--steps", "2",
                 "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 8, 8, 1)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latent" in text and "autoencoder" in text and "(ok)" in text


def test_a_latent_teacher_distils_into_a_latent_student(ldm_dir, tmp_path):
    from sfumato.distill import distill

    out = tmp_path / "student"
    distill(ldm_dir, "ct", out=out, steps=2, progress=False,
            config={"train": {"batch_size": 16, "num_threads": 1, "checkpoint_every": 0},
                    "sample": {"n_grid": 4}})
    run = Run(out)
    assert run.kind == "student" and set(run.refs) == {"teacher", "autoencoder"}
    assert run.data_shape == (2, 4, 4)
    m = sfumato.load(out)
    assert isinstance(m, LatentModel)
    assert m.sample(3, steps=1).x.shape == (3, 1, 8, 8)


def test_a_text_conditioned_dit_trains_on_latents(ae_dir, tmp_path):
    cfg = {**_ldm(ae_dir), "text": {"encoder": "tiny", "max_length": 16},
           "model": {"type": "text_conditioned",
                     "backbone": {"type": "dit", "image_size": 4, "in_channels": 2,
                                  "patch_size": 1, "hidden_size": 32, "depth": 1,
                                  "num_heads": 2, "context_dim": 32},
                     "encoder": {"depth": 1}}}
    out = tmp_path / "dit"
    train(cfg, out=out, progress=False)
    m = sfumato.load(out)
    assert isinstance(m, LatentModel) and m.text is not None
    s = m.sample(2, steps=2, prompt="a thick 3", guidance=2.0)
    assert s.x.shape == (2, 1, 8, 8) and s.prompts == ["a thick 3"] * 2


def test_a_latent_base_is_personalised_in_its_latent_space(ae_dir, ldm_dir, tmp_path):
    """LoRA on a latent class base: the concept images are encoded by the base's own
    autoencoder, the prior images are the base's latents, the run and its merge sample images
    through that autoencoder, and a changed autoencoder is refused."""
    from sfumato.personalize.combine import merge_run
    from sfumato.personalize.dreambooth import PRIOR_FILE
    from sfumato.personalize.finetune import SUBJECT_FILE

    imgs = write_bars(tmp_path / "imgs", 3, (16, 16), (2, 14), 4, 5)
    out = tmp_path / "p"
    sfumato.finetune(ldm_dir, imgs, out=out, steps=3, progress=False, prior_images=4,
                     config={"train": {"batch_size": 8}})
    run = Run(out)
    assert run.kind == "personalized" and set(run.refs) == {"base", "autoencoder"}
    assert run.resolve("autoencoder").path == ae_dir and run.data_shape == (2, 4, 4)
    from safetensors.torch import load_file

    subject = load_file(str(out / SUBJECT_FILE))["images"]
    assert subject.shape == (3, 1, 8, 8)  # read at the autoencoder's image size
    ae = sfumato.load(ae_dir)
    trainer = Trainer(run.config, out, progress=False)
    assert torch.equal(trainer.x_train[:3], ae.encode(subject))  # trained on the encoding
    assert load_file(str(out / PRIOR_FILE))["images"].shape == (4, 2, 4, 4)  # latents
    m = sfumato.load(out)
    assert isinstance(m, LatentModel) and m.num_classes == 11
    assert m.sample(2, class_labels=10, steps=2).x.shape == (2, 1, 8, 8)
    merge_run(ldm_dir, out, tmp_path / "merged")
    merged = sfumato.load(tmp_path / "merged")
    assert isinstance(merged, LatentModel) and merged.run.kind == "latent"
    z, s, y = torch.randn(2, 2, 4, 4), torch.tensor([0.5, 2.0]), torch.tensor([10, 3])
    assert torch.allclose(merged.run.network()(z, s, class_labels=y),
                          run.network()(z, s, class_labels=y), atol=1e-5)
    assert merged.sample(2, class_labels=10, steps=2).x.shape == (2, 1, 8, 8)
    # the base's autoencoder retrained in place: fine-tuning that base is refused, clearly,
    # and so is resuming a run fine-tuned from it before
    shutil.copytree(ae_dir, tmp_path / "x" / "ae")
    shutil.copytree(ldm_dir, tmp_path / "x" / "ldm")
    sfumato.finetune(tmp_path / "x" / "ldm", imgs, out=tmp_path / "r", steps=1,
                     progress=False, prior_images=2, config={"train": {"batch_size": 8}})
    train({**AE, "train": {**AE["train"], "steps": 31}}, out=tmp_path / "x" / "ae",
          progress=False)
    with pytest.raises(RunReferenceError, match="changed since"):
        sfumato.finetune(tmp_path / "x" / "ldm", imgs, out=tmp_path / "q", steps=1,
                         progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(RunReferenceError, match="is not the one the base"):
        Trainer(Run(tmp_path / "r").config, tmp_path / "r", progress=False)


def test_loras_of_a_latent_text_base_zip_and_sample_images(ae_dir, tmp_path):
    """ZipLoRA of two LoRA runs of a latent MiniLM base: trained on the encoded concept
    images, written as a run that samples images through the base's autoencoder."""
    import numpy as np

    from sfumato.personalize.combine import zip_runs

    cfg = _ldm(ae_dir)
    cfg["model"] = {**cfg["model"], "conditional": False, "context_dim": 384}
    cfg["text"] = {"encoder": "minilm", "n_variants": 1, "keep": 0.0}
    train(cfg, out=tmp_path / "base", progress=False)
    for token, col in (("sks", 2), ("zzq", 9)):
        write_bars(tmp_path / token, 1, (8, 8), (1, 7), col, 3)
        sfumato.finetune(tmp_path / "base", tmp_path / token, out=tmp_path / f"l-{token}",
                         token=token, steps=2, progress=False, prior_images=2,
                         config={"train": {"batch_size": 4}})
    summary = zip_runs(tmp_path / "l-sks", tmp_path / "l-zzq", tmp_path / "zip", steps=2)
    assert np.isfinite(summary["last_loss"])
    run = Run(tmp_path / "zip")
    assert run.resolve("autoencoder").path == ae_dir
    m = sfumato.load(tmp_path / "zip")
    assert isinstance(m, LatentModel)
    assert m.sample(2, prompt="a sks zzq", steps=2).x.shape == (2, 1, 8, 8)
