"""Defaults shared by the configs in this folder (big_vision style: each config file starts
from these and changes what it needs)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(
        kind="openmoji", data_dir="data/openmoji", image_size=96, limit=None,
        tower="efficientnet", caption_mode="random", num_threads=2,
        texts=dict(caption=dict(tokenizer="bert", max_len=24)),
    ))

    c.model = ml_collections.ConfigDict()
    c.model.image_tower = ml_collections.ConfigDict(dict(kind="efficientnet_lite0",
                                                         pretrained="package"))
    c.model.text_tower = ml_collections.ConfigDict(dict(kind="bert", pretrained="minilm"))
    c.model.freeze = (r"encoder\.image_tower\.", r"encoder\.text_tower\.")
    c.model.embed_dim = 256
    c.model.fusion = True
    c.model.dtype = "float32"            # compute dtype of towers and decoder; or "bfloat16"
    c.model.tokenizer = "bert"           # decoder tokenizer (= the text tower's here)
    c.model.decoder_vocab = "full"       # or "train": the word pieces the training captions use
    c.model.caption_len = 24             # decoder tokens per caption, BOS and EOS included
    c.model.decoder = ml_collections.ConfigDict(dict(
        vocab_size=30522, n_positions=64, width=256, layers=3, heads=4, dropout=0.1,
        gate="none", tie_word_embeddings=True))
    c.model.captioner = ml_collections.ConfigDict(dict(
        k_max=8, neighbour_len=16, neighbour_layers=1, neighbour_heads=4, chunk_len=4,
        copy_head=False))

    c.retrieval = ml_collections.ConfigDict(dict(
        index="scann",          # scann | exact
        index_params={},        # overrides of the backend's size-based defaults
        key="text",             # datastore keys: caption embeddings (image->text retrieval)
        k=4,                    # neighbours at inference (infer.py --k default, eval's k)
        top_k=16,               # training: k_max of the top K (leakage-filtered) in rank
                                # order, of which the first 1..k_max are shown
        k_dropout=0.25,         # probability that a training example sees no neighbours
        neighbour_dropout=0.1,  # probability of dropping each shown neighbour
        image_dropout=0.0,      # probability that an example's decoder sees neighbours only
        crossfit_folds=0,       # >1: training neighbours retrieved by out-of-fold encoders
        dtype="float16",
    ))

    c.train = ml_collections.ConfigDict()
    c.train.stages = ("contrastive", "datastore", "caption")
    c.train.cache_frozen_features = True
    c.train.contrastive = ml_collections.ConfigDict(dict(
        steps=300, batch_size=128, learning_rate=1e-3, warmup_steps=20, weight_decay=0.01,
        grad_clip=1.0, loss="clip", prefix_loss_weight=0.5))
    c.train.caption = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=64, learning_rate=1e-3, warmup_steps=50, weight_decay=0.01,
        grad_clip=1.0, label_smoothing=0.0,
        lm_loss_weight=0.0))    # with captioner.copy_head: CE on the LM head alone too
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.progress = True

    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

    c.generate = ml_collections.ConfigDict(dict(
        strategy="beam", num_beams=3, length_penalty=1.0, max_len=20, temperature=1.0,
        top_k=0, top_p=1.0,
        neighbour_table_mib=512.0,   # neighbour_layers=0: per-vocabulary K/V tables, 0: off
        query_lengths=16))           # text-tower lengths compiled into the loop (1: one)

    c.eval = ml_collections.ConfigDict(dict(
        enabled=True, split="test", ks=(0, 1, 4, 8), max_examples=None, batch_size=64,
        datastore_swap=True,
        recall_ks=(1, 5, 10)))
    return c


def use_demo_towers(c: ml_collections.ConfigDict) -> None:
    """EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, both frozen."""
    c.data.tower = "efficientnet"
    c.model.image_tower = ml_collections.ConfigDict(dict(kind="efficientnet_lite0",
                                                         pretrained="package"))
    c.model.text_tower = ml_collections.ConfigDict(dict(kind="bert", pretrained="minilm"))
    c.model.freeze = (r"encoder\.image_tower\.", r"encoder\.text_tower\.")
