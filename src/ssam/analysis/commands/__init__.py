"""The analysis commands, one module each (``hessian``, ``landscape``, ``sharpness``) over ``common``."""
