"""Preview Cut-Mix-Unmix collages of image folders without ComfyUI (writes a PNG grid).

    python scripts/collage_preview.py FOLDER_1 "sks dog" FOLDER_2 "zwx sculpture" --out collages.png

With no arguments it uses the demo subjects of the demo files (the picture in the
README, docs/cutmix_collages.png); that case needs a ComfyUI to write them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))  # the repository root, for devtools/ (test tooling shared with tests/ and benchmarks/)

from devtools.extension import import_extension  # noqa: E402

import_extension()

from comfyui_svdiff.svdiff.training import cutmix, data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="*", help="folder, phrase, folder, phrase, …")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "cutmix_collages.png")
    parser.add_argument("--layout", default="both", choices=cutmix.LAYOUT_CHOICES)
    parser.add_argument("--split", type=float, nargs=2, default=(0.35, 0.65))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    pairs = list(zip(args.pairs[::2], args.pairs[1::2], strict=True))
    if not pairs:
        from headless import start_comfy

        start_comfy()
        from comfyui_svdiff.svdiff.comfy.demo import write_demo_images

        demo = Path(tempfile.mkdtemp())
        for name in ("demo_sks_circle", "demo_zwx_square"):
            write_demo_images(demo / name)
        pairs = [(demo / "demo_sks_circle", "sks circle"), (demo / "demo_zwx_square", "zwx square")]
    subjects = []
    for i, (folder, phrase) in enumerate(pairs, start=1):
        token = phrase.split()[0]
        dataset = data.load_folder(Path(folder), args.resolution, trigger=token)
        items = dataset.expanded()
        subjects.append(cutmix.Subject(f"subject {i}", [x.image for x in items], [x.caption for x in items], phrase, token))
    built = cutmix.build_dataset(subjects, args.resolution, args.count, 0.6, args.layout, tuple(args.split))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cutmix.preview_grid(built.collages, columns=4).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
