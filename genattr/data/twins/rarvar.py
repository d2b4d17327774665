"""Synthetic twin of the model-tracer task (RAR / VAR variants + outliers), written in the task's own layout.

Why: the real task needs 10 released checkpoints (≈6 GB) and a GPU; the twin trains two tiny tokenizer
families (``tinyrar`` single-scale, ``tinyvar`` multi-scale residual) and four depth variants of an
autoregressive generator per family on procedural images, so the whole pipeline runs on a CPU in minutes and
tests can assert real separations (spec §9).

Folder layout (``cached_twin(cache, "rarvar", params, ...)`` → ``<root>``)::

    <root>/
      twin.json                       manifest (params, counts, image_size)
      train/<label>/<name>.png        8 labels: var16 var20 var24 var30 rarb rarl rarxl rarxxl (no outlier)
      val/<label>/<name>.png          9 labels: the 8 above + outlier
      test/<name>.png                 flat, unlabelled
      test_labels.csv                 HIDDEN: image_name,label (the scorer's answer key)
      hidden/metadata.csv             HIDDEN: split,image_name,label,family,class_id,outlier_kind,row
                                      family: var|rar|"" ; outlier_kind: ""|procedural|unknown_family|reconstruction
                                      row: index into hidden/<split>_<family>.safetensors (-1 if none)
      hidden/<split>_<family>.safetensors
                                      tokens [N, L] int64 (sampled, or greedy for reconstructions),
                                      latent [N, C, h, w] float32 (exact f_Z = tokens_to_latent(tokens)),
                                      labels [N] int64 (class id)
      checkpoints/models.json         how to build every model: {"var": {"tokenizer": {_target_ + kwargs},
                                      "tokenizer_checkpoint": "var/tokenizer.safetensors",
                                      "variants": {"var16": {"generator": {_target_ + kwargs},
                                      "checkpoint": "var/var16.safetensors"}, ...}}, "rar": {...}}
                                      (the same structure as ``conf/model/prada_real.yaml``, whose checkpoint
                                      entries name the upstream files, e.g. ``vae_ch160v4096z32.pth``)
      checkpoints/var/tokenizer.safetensors, checkpoints/var/var{16,20,24,30}.safetensors
      checkpoints/rar/tokenizer.safetensors, checkpoints/rar/rar{b,l,xl,xxl}.safetensors

Both twin and real checkpoints load through ``genattr.models.tokenizers.checkpoint.load_tokenizer_checkpoint``
/ ``load_generator_checkpoint`` (safetensors or weights-only torch pickles). The unknown third family that
makes the ``unknown_family`` outliers is NOT in ``checkpoints/`` (the method must not see it).

Twin images are ``image_size`` × ``image_size`` (32 by default, spec §9.1); the real dataset is 256×256. The
size check lives in the task loader (``genattr/data/rarvar.py``), which takes the expected size from config
(the twin profile sets it to the twin's ``image_size``).
"""
