"""Training throughput: sfumato's U-Net vs diffusers' UNet2DModel, side by side.

One training step = forward + MSE loss + backward + AdamW step, on a fixed random batch.
For each resolution both networks are built with the same architecture (ADM layout,
scale-shift norm, same widths, attention at the same level, same heads), so their parameter
counts match (checked: within 10%). The two are measured in one process, interleaved
(A B A B ...) after a warm-up, and the median images/s over the repetitions is reported with
the ratio sfumato / diffusers.

    python benchmarks/train_throughput.py                  # 8x8 and 28x28, batch 64
    python benchmarks/train_throughput.py --res 28 --batch 128 --reps 9

Needs diffusers (pip install 'sfumato[bench]'); without it only sfumato is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sfumato.nets import UNet, count_params

# resolution -> (sfumato UNet kwargs, diffusers UNet2DModel kwargs) of the same architecture
CONFIGS: dict[int, tuple[dict, dict]] = {
    8: (
        dict(image_size=8, in_channels=1, model_channels=64, channel_mult=(1, 2),
             num_res_blocks=2, attention_resolutions=(4,), num_heads=4),
        dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(64, 128),
             layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
             resnet_time_scale_shift="scale_shift"),
    ),
    28: (
        dict(image_size=28, in_channels=1, model_channels=32, channel_mult=(1, 2, 2),
             num_res_blocks=2, attention_resolutions=(7,), num_heads=4),
        dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
             layers_per_block=2,
             down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=16,
             resnet_time_scale_shift="scale_shift"),
    ),
}


class _Trainer:
    """A network, its AdamW optimizer and one fixed batch; ``step()`` is one training step."""

    def __init__(self, name: str, net: torch.nn.Module, batch: int, res: int,
                 unwrap: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.name, self.net, self.unwrap = name, net, unwrap
        self.opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        self.x = torch.randn(batch, 1, res, res, generator=g)
        self.c = torch.randn(batch, generator=g)
        self.y = torch.randn(batch, 1, res, res, generator=g)
        self.params = count_params(net)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.net(self.x, self.c)
        if self.unwrap:
            out = out.sample
        torch.nn.functional.mse_loss(out, self.y).backward()
        self.opt.step()

    def timed(self, steps: int, clock: Callable[[], float]) -> float:
        """images/s over ``steps`` consecutive steps."""
        t = clock()
        for _ in range(steps):
            self.step()
        return steps * self.x.shape[0] / (clock() - t)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter,
                                          "process": time.process_time}


def run(res: int, batch: int, reps: int, steps: int, warmup: int,
        clock: str = "wall") -> dict:
    ours_cfg, diff_cfg = CONFIGS[res]
    torch.manual_seed(0)
    runners = [_Trainer("sfumato", UNet(**ours_cfg), batch, res, unwrap=False)]
    try:
        from diffusers import UNet2DModel
    except ImportError:
        print("diffusers not installed: timing sfumato only")
    else:
        torch.manual_seed(0)
        runners.append(_Trainer("diffusers", UNet2DModel(**diff_cfg), batch, res, unwrap=True))
    if len(runners) == 2:
        p0, p1 = runners[0].params, runners[1].params
        assert abs(p0 / p1 - 1) < 0.1, f"parameter counts differ by more than 10%: {p0} vs {p1}"
    for r in runners:
        for _ in range(warmup):
            r.step()
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(reps):
        order = runners if i % 2 == 0 else runners[::-1]  # alternate who goes first
        for r in order:
            rates[r.name].append(r.timed(steps, CLOCKS[clock]))
    out = {"res": res, "batch": batch}
    for r in runners:
        med = statistics.median(rates[r.name])
        out[r.name] = (r.params, med)
        print(f"  {r.name:9s} {r.params / 1e6:7.3f} M params   {med:8.1f} img/s "
              f"({med / batch:6.2f} it/s)   reps: "
              + " ".join(f"{v:.0f}" for v in rates[r.name]))
    if len(runners) == 2:
        out["ratio"] = out["sfumato"][1] / out["diffusers"][1]
        print(f"  ratio sfumato/diffusers = {out['ratio']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--res", type=int, nargs="+", default=[8, 28], choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per repetition")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time; process: CPU time of this process (all threads; "
                         "robust when other jobs share the cores, best with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.clock} clock")
    for res in args.res:
        print(f"{res}x{res}:")
        run(res, args.batch, args.reps, args.steps, args.warmup, args.clock)


if __name__ == "__main__":
    main()
