"""`config.fid`: its fields (defaults and sources in config_base.py) and their checks.

Checked with the rest of the config before any compute (config_check.validate), without
importing the network; whether the weights and reference files exist is checked when --mode=fid
starts, before sampling.
"""

FIELDS = {"num_samples", "batch_size", "inception_weights", "reference", "num_reference",
          "samples", "save_samples", "resize", "preprocess", "precision", "is_splits", "pr_k",
          "pr_batch_size"}
TFDS_PREFIX = "tfds:"
PREPROCESS = ("adm", "pytorch_fid")   # input conventions (evaluation/inception.py)
PRECISIONS = ("highest", "default")   # matmul / conv precision of the Inception network
MIN_RESIZE = 75      # the smallest input whose feature maps stay non-empty through Mixed_7c


def validate(fid) -> None:
  """Raises ValueError naming the config.fid field and the fix."""
  def need(ok: bool, name: str, why: str):
    if not ok:
      raise ValueError(f"config.fid.{name} = {fid.get(name)!r}: {why}")

  positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  for name in ("num_samples", "batch_size", "is_splits", "pr_k", "pr_batch_size"):
    need(positive(fid[name]), name, "must be a positive integer")
  need(fid.is_splits <= fid.num_samples, "is_splits",
       f"must be <= config.fid.num_samples = {fid.num_samples} (every split needs a sample)")
  need(fid.pr_k < fid.num_samples, "pr_k",
       f"must be < config.fid.num_samples = {fid.num_samples} (k-th nearest neighbours)")
  need(isinstance(fid.num_reference, int) and fid.num_reference >= 0, "num_reference",
       "must be an integer >= 0 (0: every reference image)")
  need(isinstance(fid.resize, int) and fid.resize >= MIN_RESIZE, "resize",
       f"must be an integer >= {MIN_RESIZE} (the published protocol: 299)")
  need(fid.preprocess in PREPROCESS, "preprocess",
       f"must be one of {PREPROCESS}")
  need(fid.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
  need(fid.inception_weights is None or isinstance(fid.inception_weights, str),
       "inception_weights", "must be a path to the .pth / converted .npz, or 'random'")
  ref = fid.reference
  need(ref is None or (isinstance(ref, str) and (
      ref.endswith(".npz") or (ref.startswith(TFDS_PREFIX) and len(ref) > len(TFDS_PREFIX)))),
       "reference", "must be a reference batch .npz (ADM's format) or 'tfds:<split>' of "
       "config.data, e.g. 'tfds:test'")
  need(fid.samples is None or (isinstance(fid.samples, str) and fid.samples.endswith(".npz")),
       "samples", "must be None (sample now) or the path of a samples .npz")
  need(isinstance(fid.save_samples, bool), "save_samples", "must be True or False")
