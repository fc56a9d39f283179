"""Is the report cohort's finding (lung nodule yes/no) in the image? Two checks on held-out phantoms.

Usage::

    python bench/probe_report_phantoms.py --grid chest3 --steps 600   # 3 mm, chest field of view
    python bench/probe_report_phantoms.py --grid whole6 --steps 600   # the 6 mm default cohort
    python bench/probe_report_phantoms.py --grid chest3 --steps 600 --shuffle   # control

1. A fixed detector (nothing fitted): voxels above -300 HU inside the one-voxel dilated lung labels
   that survive a 2 x 2 x 2 binary opening (one-voxel vessels do not; a nodule of several voxels
   does), scored as AUROC over the held-out cohort (seed 1).
2. A supervised probe: a small CNN (3 conv layers, one stride 2, global max pooling, linear)
   trained with BCE on ``--train`` phantoms of seed 0 (the report loader's input: body crop,
   CT window [-1000, 1000], resize), held-out accuracy and AUROC on 48 phantoms of seed 1 every 25
   steps. ``--shuffle`` permutes the training labels (the probe must then stay at chance).

One torch thread. See docs/reports.md, "Finer grid".
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import ndimage

from volumed.data.report_phantoms import make_report_cohort
from volumed.tasks.report import ReportVolumeLoader

GRIDS = {
    "whole6": (dict(shape=(48, 48, 32), spacing=(6.0, 6.0, 6.0)), (48, 48, 32)),
    "chest3": (dict(shape=(96, 96, 64), spacing=(3.0, 3.0, 3.0), field_of_view="chest"), (64, 48, 32)),
}
LUNGS = [10, 11, 12, 13, 14]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="chest3")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--min-nodule-mm", type=float, default=12.0)
    ap.add_argument("--shuffle", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kw, size = GRIDS[args.grid]
    start = time.time()
    test = make_report_cohort(48, 1, min_nodule_mm=args.min_nodule_mm, **kw)
    y_test = np.array([p.nodule for p in test])
    counts = []
    for p in test:
        lung = ndimage.binary_dilation(np.isin(p.case.label.data, LUNGS), iterations=1)
        counts.append(ndimage.binary_opening((p.case.image.data > -300) & lung, structure=np.ones((2, 2, 2))).sum())
    print(f"{args.grid}: detector AUROC {auroc(np.array(counts, float), y_test):.3f} on 48 held-out phantoms", flush=True)

    loader = ReportVolumeLoader(size, None, (-1000.0, 1000.0), "CT")

    def tensors(cohort):
        x = torch.stack([loader({"image": p.case.image, "report": p.report, "case_id": p.case.case_id})["image"] for p in cohort])
        return x, torch.tensor([float(p.nodule) for p in cohort])

    x_tr, y_tr = tensors(make_report_cohort(args.train, 0, min_nodule_mm=args.min_nodule_mm, **kw))
    x_te, _ = tensors(test)
    if args.shuffle:
        y_tr = y_tr[torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(0))]
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(),
        nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.InstanceNorm3d(16, affine=True), nn.LeakyReLU(),
        nn.Conv3d(16, 16, 3, padding=1), nn.InstanceNorm3d(16, affine=True), nn.LeakyReLU(),
        nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_tr), (8,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x_tr[idx]).squeeze(1), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            net.eval()
            with torch.no_grad():
                s = torch.cat([net(x_te[i:i + 8]).squeeze(1) for i in range(0, len(x_te), 8)]).numpy()
            net.train()
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {((s > 0) == y_test).mean():.3f}, "
                  f"AUROC {auroc(s, y_test):.3f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
