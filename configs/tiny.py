"""The smallest end-to-end run: every stage on OpenMoji with tiny random towers.

    python train.py --config configs/tiny.py --workdir /tmp/ravlm_tiny

Runs contrastive alignment, the datastore build and captioning for a few steps each, with a
checkpoint every few steps, in well under 2 minutes on 2 CPU cores. The numbers it reaches
mean nothing (the towers are random and tiny); tests and checks use it to exercise the
whole system. ``configs/tiny.py:pretrained`` swaps in the demo's real towers (frozen and
cached) and its recipe (decoder vocabulary subset, copy head, LM-head loss), plus
cross-fitted neighbours and image dropout so that every training path runs.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = common.base_config()
    config.data.image_size = 32
    config.data.limit = 600              # emoji rasterized for this run's dataset
    config.data.tower = "clip"
    config.data.texts.caption.max_len = 16

    m = config.model
    m.image_tower = ml_collections.ConfigDict(dict(
        kind="vit", pretrained="", dims=dict(image_size=32, patch_size=8, width=32, layers=1,
                                             heads=2, mlp_dim=64)))
    m.text_tower = ml_collections.ConfigDict(dict(
        kind="bert", pretrained="", dims=dict(vocab_size=30522, width=32, layers=1, heads=2,
                                              mlp_dim=64, max_len=64)))
    m.freeze = ()
    m.embed_dim = 32
    m.decoder.update(width=32, layers=1, heads=2, n_positions=32)
    m.captioner.update(k_max=4, neighbour_len=8, neighbour_layers=1, neighbour_heads=2,
                       chunk_len=4)
    if arg == "pretrained":  # the demo's towers and training recipe, in miniature
        common.use_demo_towers(config)
        config.model.decoder_vocab = "train"
        config.model.captioner.copy_head = True
        config.train.caption.lm_loss_weight = 0.3
        config.retrieval.update(crossfit_folds=2, image_dropout=0.5)

    config.retrieval.update(k=2, top_k=4)
    t = config.train
    t.contrastive.update(steps=6, batch_size=16, learning_rate=1e-3, warmup_steps=1)
    t.caption.update(steps=6, batch_size=16, learning_rate=1e-3, warmup_steps=1)
    t.checkpoint_every = 2
    t.log_every = 1
    t.eval_every = 0
    config.eval.update(ks=(0, 2), max_examples=16, batch_size=16)
    config.generate.update(max_len=12, num_beams=1, strategy="greedy")
    return config
