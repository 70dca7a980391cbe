"""Write service/probing/builtin/digits.npz from scikit-learn's copy of the UCI handwritten digits.

The probe engine reads the file with numpy only, so it needs no scikit-learn at run time. Run again
(`python scripts/make_digits_npz.py`) only to regenerate it; the output is deterministic.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "service" / "probing" / "builtin" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # integer pixel counts 0..16
    labels = digits.target.astype(np.uint8)
    assert images.shape == (1797, 8, 8) and images.max() == 16 and set(labels.tolist()) == set(range(10))
    # np.savez_compressed stamps the current time into the zip: write the members with a fixed date.
    with zipfile.ZipFile(OUT, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in (("images", images), ("labels", labels)):
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1998, 7, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
