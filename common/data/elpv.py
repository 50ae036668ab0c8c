"""Write the ELPV solar-cell images (the `elpv-dataset` package) as a class-folder tree.

    python -m common.data.elpv data/elpv                      # 2,624 images: functional/ and defective/
    python -m common.data.elpv data/elpv-small --per-class 40 # a small subset (the tests use one)
    python -m common.data.elpv data/elpv4 --classes 4         # the four annotated probabilities

The package holds 2,624 real 300x300 grayscale electroluminescence images of
solar-cell crops, each labelled with the probability that the cell is
defective as judged by experts: 0, 1/3, 2/3 or 1. The default classes are
"defective" (probability >= 0.5) and "functional": the intermediate grades
mark annotator uncertainty (106 cells at 2/3), so the four-way labels are noisy
and badly unbalanced, while the binary split is the decision an inspection
line makes. Licence of the images: CC BY-NC-SA 4.0 (Deitsch et al., 2018/2019);
they are installed from PyPI by `make install`, never committed here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout

from common.core.errors import UsageError  # noqa: E402

CLASS_SCHEMES = {
    "binary": lambda probability: "defective" if probability >= 0.5 else "functional",
    "4": lambda probability: f"p{round(probability * 3)}of3",
}


def package_data() -> str:
    try:
        import elpv_dataset
    except ImportError:
        raise UsageError("the elpv-dataset package is missing; run make install (or pip install "
                         "elpv-dataset==1.0.0.post1)") from None
    return os.path.join(os.path.dirname(elpv_dataset.__file__), "data")


def read_labels(data: str) -> list[tuple[str, float, str]]:
    """(image path, defect probability, cell type) per line of the package's labels.csv."""
    rows = []
    with open(os.path.join(data, "labels.csv"), encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                path, probability, cell_type = line.split()
                rows.append((os.path.join(data, path), float(probability), cell_type))
    return rows


def write_tree(out: str, scheme: str = "binary", per_class: int = 0) -> dict:
    """Copy the images into ``out/<class>/``; {class: count}. With ``per_class`` only the first
    that many of each class (in file order, so a subset is the same on every machine)."""
    name_of = CLASS_SCHEMES[scheme]
    counts: dict = {}
    for path, probability, cell_type in read_labels(package_data()):
        label = name_of(probability)
        if per_class and counts.get(label, 0) >= per_class:
            continue
        folder = os.path.join(out, label)
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(path, os.path.join(folder, f"{cell_type}_{os.path.basename(path)}"))
        counts[label] = counts.get(label, 0) + 1
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write (it must not exist yet, or be empty)")
    parser.add_argument("--classes", choices=sorted(CLASS_SCHEMES), default="binary")
    parser.add_argument("--per-class", type=int, default=0, help="at most this many images per class (0: all)")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"{args.out} is not empty; choose a new directory (or remove it first)")
    counts = write_tree(args.out, args.classes, args.per_class)
    print(f"wrote {sum(counts.values())} images to {args.out}: "
          + ", ".join(f"{name} {count}" for name, count in sorted(counts.items())))


if __name__ == "__main__":
    from common.launch.entry import run_entry  # the command's outer frame (it can MPI_Abort)

    run_entry(main)
