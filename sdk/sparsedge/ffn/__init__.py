"""FFN contextual sparsity with SVD predictors (docs/methods.md §1).

    attach_predictors(model, "art/", backend)   # Session.load(..., predictors="art/") calls this
    SparseFFN                                   # the module that replaces each layer's DenseFFN

Predictor construction and threshold calibration live in sparsedge.calibrate.predictor (tensor math) and
sparsedge.calibrate (collection, calibration, the tools/calibrate.py CLI).
"""
from sparsedge.ffn.module import SparseFFN, attach_predictors, attach_tensors, detach_predictors, set_per_token

__all__ = ["SparseFFN", "attach_predictors", "attach_tensors", "detach_predictors", "set_per_token"]
