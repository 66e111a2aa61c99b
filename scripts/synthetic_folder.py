"""Write the offline synthetic textures (selfclassifier.make_synthetic: its 2,000 training then 500 test images, again
as often as needed) as N unlabelled 32 px PNG files: a folder to try training, --predict and --grid-dir on.

    python scripts/synthetic_folder.py photos 3000
"""
import pathlib
import sys

import torch
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import selfclassifier as sc  # noqa: E402

if len(sys.argv) != 3 or not sys.argv[2].isdigit():
    sys.exit("usage: python scripts/synthetic_folder.py OUT_DIR N")
out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
images = torch.cat([sc.make_synthetic(True).images, sc.make_synthetic(False).images])
out.mkdir(parents=True, exist_ok=True)
for i in range(n):
    Image.fromarray(images[i % len(images)].permute(1, 2, 0).numpy()).save(out / f"{i:05d}.png")
print(f"wrote {n} images to {out}")
