"""The untrained tiny model the post-training tests share: a 32-px SigLIP tile encoder, a small Llama and the tiny tokenizer."""
import torch
from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
from mmlit.processing import MMProcessor, tiny_tokenizer


def tiny_pair(seed: int = 0, text_layers: int = 1):
    "(model in eval mode, processor): one 32-px tile per image, 4 visual tokens per tile, weights seeded by `seed`."
    tok = tiny_tokenizer()
    cfg = tiny_config(image_size=32, patch_size=8, vision_hidden=64, vision_layers=1, text_hidden=64, text_layers=text_layers,
                      vision_model_type="siglip_vision_model")
    torch.manual_seed(seed)
    m = MMModel(cfg); fit_to_tokenizer(m, tok)
    return m.eval(), MMProcessor.from_vision_config(cfg.vision_config, tok, max_num=1, use_thumbnail=False)
