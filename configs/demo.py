"""The offline demo: OpenMoji captions with real pretrained towers, on a laptop CPU.

    python train.py --config configs/demo.py --workdir workdirs/demo

EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2, both frozen (their features are cached
once); trained projections and fusion (contrastive stage), a datastore of the training
split's captions, and a small decoder sharing MiniLM's BERT vocabulary that cross-attends
to the image tokens and to k retrieved captions (k sampled up to 8, re-retrieved every 4
tokens), with a copy head (pointer-generator) over the retrieved tokens. ``make demo`` runs
it and writes docs/RESULTS.md from its eval.json.

Expected (fresh clone, 2 CPU cores): train + evaluate in about 8 minutes; on the test split
CIDEr-D 0.310 at k=0, 0.351 at k=4 (+13%), 0.346 at k=8 (beam 3), image->text R@1 0.267,
R@10 0.595. docs/PERFORMANCE.md (Demo) has every variant tried, the seed-to-seed spread,
and the trade-off set by ``train.caption.lm_loss_weight``.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = common.base_config()
    common.use_demo_towers(config)
    config.data.image_size = 96
    config.model.caption_len = 16
    config.model.decoder_vocab = "train"
    config.model.decoder.update(width=256, layers=3, heads=4, n_positions=32, dropout=0.1,
                                cross_attention_reduce_factor=2)
    # The copy head lets a decoder trained from scratch write a retrieved word directly
    # (without it, it learned to ignore its neighbours unless its image was hidden).
    config.model.captioner.update(k_max=8, neighbour_len=8, neighbour_layers=0, chunk_len=4,
                                  copy_head=True)
    config.retrieval.update(image_dropout=0.0, top_k=8)
    config.train.contrastive.update(steps=300, batch_size=256, learning_rate=2e-3)
    # A second loss on the LM head alone, weighted 0.3, keeps the decoder able to caption
    # without neighbours; at 1.0 k=0 is as good as k=4 (docs/PERFORMANCE.md, Demo).
    config.train.caption.update(steps=800, batch_size=64, learning_rate=1e-3,
                                lm_loss_weight=0.3)
    config.train.checkpoint_every = 100
    config.train.log_every = 10
    return config
