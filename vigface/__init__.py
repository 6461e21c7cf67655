"""vigface: VIGFace (virtual identity generation for face recognition), built for speed.

Stage 1 trains an FR model whose feature space holds real and virtual identity prototypes;
stage 2 trains an identity-conditioned pixel diffusion model and samples faces of real or
virtual people. See README.md and DESIGN.md.
"""

from vigface.errors import AlignmentError, BackendUnavailableError, DataFormatError, VigfaceError

__version__ = "0.1.0"

__all__ = ["AlignmentError", "BackendUnavailableError", "DataFormatError", "VigfaceError", "__version__"]
