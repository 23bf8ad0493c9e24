"""BitFit (Ben Zaken et al. 2022): only the bias terms train, in place."""
from fastpeft.methods.bitfit.config import BitFitConfig
from fastpeft.methods.bitfit.method import BitFitMethod

__all__ = ["BitFitConfig", "BitFitMethod"]
