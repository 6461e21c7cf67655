"""The paper's table of peers (IR-SE50 + AdaFace trained on each synthetic dataset, five-benchmark
accuracies) that reports print beside our numbers: torch-free, so that vigface-eval's --help and
its --real-reference check do not wait for torch's import."""

from __future__ import annotations

from vigface.errors import VigfaceError

PEER_COLUMNS = ("method", "source", "images", "lfw", "cfp_fp", "cplfw", "agedb_30", "calfw", "average")
# fmt: off
PEER_TABLE = [
    ("CASIA (Real)", "-", "0.49M (10.5K x 47)", 99.40, 96.63, 90.23, 94.68, 93.70, 94.93),
    ("SynFace", "FFHQ", "0.5M (10K x 50)", 91.93, 75.03, 70.43, 61.63, 74.73, 74.75),
    ("DigiFace", "3D modeling", "0.5M (10K x 50)", 95.40, 87.40, 78.87, 76.97, 78.62, 83.45),
    ("DCFace", "FFHQ+CASIA", "0.5M (10K x 50)", 98.55, 85.33, 82.62, 89.70, 91.60, 89.56),
    ("IDiffFace", "FFHQ", "0.5M (10K x 50)", 98.00, 85.47, 80.45, 86.43, 90.65, 88.20),
    ("GANDiffFace", "FFHQ", "0.5M (10K x 50)", 90.77, 73.27, 72.32, 66.35, 74.68, 75.48),
    ("ID^3", "CASIA", "0.5M (10K x 50)", 97.68, 86.84, 82.77, 91.00, 90.73, 89.80),
    ("CemiFace", "CASIA+WebFace4M", "0.5M (10K x 50)", 99.03, 91.06, 87.62, 91.33, 92.42, 92.30),
    ("Arc2Face", "WebFace42M", "0.5M (10K x 50)", 98.81, 91.87, 85.16, 90.18, 92.63, 91.73),
    ("HyperFace", "WebFace42M", "0.5M (10K x 50)", 98.50, 88.83, 84.23, 86.53, 89.40, 89.50),
    ("HSFace10K", "WebFace4M", "0.5M (10K x 50)", 98.87, 88.97, 85.47, 93.12, 93.57, 92.00),
    ("VIGFace(S)", "CASIA", "0.5M (10K x 50)", 99.02, 95.09, 87.72, 90.95, 90.00, 92.56),
    ("DCFace", "FFHQ+CASIA", "1.2M (20K x 50 + 40K x 5)", 98.58, 88.61, 85.07, 90.97, 92.82, 91.21),
    ("CemiFace", "CASIA+WebFace4M", "1.2M (20K x 50 + 40K x 5)", 99.22, 92.84, 88.86, 92.13, 93.03, 93.22),
    ("Arc2Face", "WebFace42M", "1.2M (20K x 50 + 40K x 5)", 98.92, 94.58, 86.45, 92.45, 93.33, 93.14),
    ("HSFace20K", "WebFace4M", "1.0M (20K x 50)", 98.87, 89.87, 86.13, 93.85, 93.65, 92.47),
    ("HSFace300K", "WebFace4M", "15M (300K x 50)", 99.30, 91.54, 87.70, 94.45, 94.58, 93.52),
    ("VIGFace(B)", "CASIA", "1.2M (60K x 20)", 99.48, 97.07, 90.15, 93.62, 92.88, 94.64),
    ("VIGFace(L)", "CASIA", "6.0M (120K x 50)", 99.33, 97.31, 91.12, 93.82, 92.95, 94.91),
]
# fmt: on
PEER_NOTE = (
    "FR benchmark results of IR-SE50 + AdaFace trained on virtual face datasets (VIGFace README); "
    "all except CASIA-WebFace and VIGFace from the original papers."
)
DEFAULT_REAL_REFERENCE = "CASIA (Real)"


def peer_rows() -> list[dict]:
    return [dict(zip(PEER_COLUMNS, row, strict=True)) for row in PEER_TABLE]


def peer_average(method: str) -> float:
    """The five-set average of a PEER_TABLE row named `method`. Some methods have a row per dataset
    size: the name alone picks the first (0.5M) row, the name and size ("DCFace 1.2M") the other."""
    for row in PEER_TABLE:
        if method in (row[0], f"{row[0]} {row[2].split()[0]}"):
            return row[-1]
    names = ", ".join(dict.fromkeys(r[0] for r in PEER_TABLE))
    raise VigfaceError(
        f"--real-reference: no peer named {method!r}; choose one of {names} (for a method listed at "
        "several sizes, add the size: 'DCFace 1.2M')"
    )
