"""The checks that read the disk, made once before any worker trains.

Called by the launcher before Ray starts a worker, and by torchrun's rank 0 while the
other ranks wait: a bad tracking store, checkpoint, upcycling source or corpus is one
:class:`~turnout.errors.ConfigError` naming its key, before any training starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from turnout.config import TurnoutConfig


def preflight(cfg: TurnoutConfig) -> Path:
    """The checks that read the disk, made once before any worker trains.

    The tracking store's kind, the ``train.resume`` checkpoint (else the
    ``train.init_from`` source's config against this model), then the corpus
    (:func:`prepare_data`). Raises ConfigError naming tracking.uri, train.resume,
    train.init_from / the model key it cannot map, or data.*; returns the token cache.
    """
    from turnout.trainer.tracking.uri import check_tracking_uri

    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.uri)
    if cfg.train.resume:
        from turnout.trainer.resume.layout import resume_config, verify_checkpoint

        verify_checkpoint(cfg.train.resume)  # every file as written (the manifest)
        resume_config(cfg)  # and it fits this layout
    elif cfg.train.init_from:
        from turnout.trainer.weights.upcycle import check_init_from

        check_init_from(cfg)
    return prepare_data(cfg)


def prepare_data(cfg: TurnoutConfig) -> Path:
    """Tokenize the corpus once, on the launcher, and check the splits fit the run.

    Raises ConfigError('data.*' / 'model.vocab_size') before any worker starts. The
    function-name task (``data.structure: ast``) parses the corpus into its structure
    cache instead, and warns once (stderr) about files that did not parse.
    """
    from turnout.config.train import validate_vocab
    from turnout.trainer.data.batches import BatchSampler, open_tokens
    from turnout.trainer.data.token_cache import prepare_corpus

    # Not in the config's own validation: a config that only builds a model (plan, tests,
    # upcycling sources) may have any vocabulary; training on a corpus may not.
    validate_vocab(cfg.data, cfg.model.vocab_size)
    if cfg.data.structure:
        from turnout.trainer.data.structure.dataset import StructureData
        from turnout.trainer.data.structure.prepare import prepare_structure
        from turnout.trainer.structure.sampler import StructureSampler

        folder, warning = prepare_structure(cfg)
        if warning:
            print(f"turnout: warning: {warning}", file=sys.stderr)
        t = cfg.train  # the sampler's own checks (a held-out function exists)
        encoder = cfg.model.structure.encoder
        workers = cfg.launch.num_workers
        cache = StructureData(folder)
        StructureSampler(cache, encoder, t.micro_batch_size, 0, workers, t.seed, t.eval_batches)
        return folder

    path = Path(prepare_corpus(cfg.data, cfg.model.vocab_size))
    # The samplers' own size checks, for every rank's shard (cheap: a memmap).
    data = open_tokens(path, cfg.data.val_fraction)
    BatchSampler(
        data,
        cfg.model.max_seq_len,
        cfg.train.micro_batch_size,
        rank=0,
        world=cfg.launch.num_workers,
        seed=cfg.train.seed,
        eval_batches=cfg.train.eval_batches,
    )
    return path
