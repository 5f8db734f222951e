"""Regenerate the README's analysis figures from a flux-tiny capture (CPU, no download, under a minute).

    uv run python scripts/make_docs_figures.py

Captures "a red cube" (seed 1, 256x256, 4 steps) into a temporary folder, runs the analysis on it and
copies the plots to docs/: heatmap_flux_tiny.png (relative L2 distance to what the model produced) and
norms_flux_tiny.png (token norms of the image and text streams).
"""

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"heatmap_rel_l2.png": "heatmap_flux_tiny.png", "norms.png": "norms_flux_tiny.png"}


def main() -> int:
    from flux.analysis import analyze
    from flux.pipeline import RunOptions, generate, load_models

    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(
            model="flux-tiny",
            prompt="a red cube",
            seed=1,
            device="cpu",
            output_dir=tmp,
            should_decode_intermediates=False,
        ).validate()
        result = generate(load_models(opts.spec, "cpu"), opts, progress=False)
        analyze(result.capture_path, Path(tmp) / "analysis", device="cpu", animation=False)
        for source, target in FIGURES.items():
            shutil.copyfile(Path(tmp) / "analysis" / source, ROOT / "docs" / target)
            print(f"wrote {ROOT / 'docs' / target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
