"""Hugging Face text towers as open_clip builds them, without the hub: each repository's
published config.json beside tokenizer files built locally in its family's format
(tests/hf_tokenizer_files.py), and open_clip's own model config pointed at that folder.

    name = register(tmp_path, "xlm-roberta-base-ViT-B-32", "tiny")
    encoder = load_encoder(name, "random")   # the real classes (XLMRobertaModel, M2M100's encoder)

Sizes: "tiny" keeps each tower's classes, pooling, projection and tokenizer and shrinks its
sizes, and the picture tower's, so that an export takes seconds; "text" keeps the text tower's
published widths (hidden size, heads, feed-forward) in two of its twelve layers (each layer is
the same code: depth adds export time, not paths; the bench's multilingual section exports all
twelve), its vocabulary cut to the tokenizer built here (a row of the embedding table is looked
up, not computed: 192 M of xlm-roberta-base's 278 M parameters, 262 M of NLLB's encoder's
413 M), with one layer of NLLB's decoder (which open_clip drops) and a tiny picture tower;
"published" keeps every size.
"""

import json
from pathlib import Path

import open_clip

from tests.hf_tokenizer_files import nllb, xlm_roberta_as_on_the_hub

XLM_ROBERTA_BASE = {  # huggingface.co/FacebookAI/xlm-roberta-base/blob/main/config.json
    "architectures": ["XLMRobertaForMaskedLM"],
    "model_type": "xlm-roberta",
    "vocab_size": 250002,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "position_embedding_type": "absolute",
}
NLLB_200_DISTILLED_600M = {  # huggingface.co/facebook/nllb-200-distilled-600M/blob/main/config.json
    "architectures": ["M2M100ForConditionalGeneration"],
    "model_type": "m2m_100",
    "vocab_size": 256206,
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "activation_function": "relu",
    "activation_dropout": 0.0,
    "attention_dropout": 0.1,
    "dropout": 0.1,
    "encoder_layerdrop": 0,
    "decoder_layerdrop": 0,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "max_length": 200,
    "max_position_embeddings": 1024,
    "scale_embedding": True,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "tokenizer_class": "NllbTokenizer",
    "use_cache": True,
}
# what each architecture's text tower reads from the hub: its tokenizer's format and its configuration
TOWERS = {
    "xlm-roberta-base-ViT-B-32": (xlm_roberta_as_on_the_hub, XLM_ROBERTA_BASE),
    "nllb-clip-base-siglip": (nllb, NLLB_200_DISTILLED_600M),
}
TINY_SIZES = {
    "xlm-roberta": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
    "m2m_100": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2}
    | {"decoder_attention_heads": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128},
}
LAYERS = {"xlm-roberta": "num_hidden_layers", "m2m_100": "encoder_layers"}
TINY_VISION = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}


def register(folder: Path, architecture: str, sizes: str = "tiny") -> str:
    """Register `architecture`'s open_clip config with its text tower's repository in `folder`; the name registered."""
    build, published = TOWERS[architecture]
    repository = build(folder / "repository")
    config = dict(published)
    if sizes in ("tiny", "text"):
        vocabulary = json.loads((repository / "tokenizer.json").read_text(encoding="utf-8"))
        size = max(token["id"] for token in vocabulary["added_tokens"]) + 1
        config["vocab_size"] = max(size, len(vocabulary["model"]["vocab"]))
        if "decoder_layers" in config:  # NLLB's decoder, built and then dropped by open_clip
            config["decoder_layers"] = 1
    if sizes == "text":
        config[LAYERS[config["model_type"]]] = 2
    if sizes == "tiny":
        config |= TINY_SIZES[config["model_type"]]
    (repository / "config.json").write_text(json.dumps(config), encoding="utf-8")
    model = open_clip.get_model_config(architecture)
    model["text_cfg"] |= {"hf_model_name": str(repository), "hf_tokenizer_name": str(repository)}
    if sizes in ("tiny", "text"):
        model["vision_cfg"] = TINY_VISION
    name = f"{architecture}-{sizes}-local"
    (folder / f"{name}.json").write_text(json.dumps(model), encoding="utf-8")
    open_clip.add_model_config(folder / f"{name}.json")
    return name
