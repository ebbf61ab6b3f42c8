"""impasto.lora: LoRA adapter formats, the canonical form, composition math and the toolbox.

Uses none of core / compiler / training / backends / server (DESIGN.md); they use it.
"""

from .canonical import COMPONENTS, CanonicalAdapter, LoraModule, canonical_target
from .compose import DeltaCache, compose
from .errors import AdapterFormatError, AdapterMismatchError
from .export import export_diffusers, export_kohya, export_peft_folder
from .extract import extract_lora, extract_lora_from_folders
from .formats import detect_format, parse_state_dict
from .fuse import fuse_into_folder
from .hashing import a1111_short_hash, addnet_hash, lora_hashes_infotext, whole_file_sha256
from .load import load_adapter
from .match import MatchReport, match_targets, named_weight_shapes_of
from .merge import merge_cat, merge_linear, merge_svd

__all__ = [
    "COMPONENTS",
    "AdapterFormatError",
    "AdapterMismatchError",
    "CanonicalAdapter",
    "DeltaCache",
    "LoraModule",
    "MatchReport",
    "a1111_short_hash",
    "addnet_hash",
    "canonical_target",
    "compose",
    "detect_format",
    "export_diffusers",
    "export_kohya",
    "export_peft_folder",
    "extract_lora",
    "extract_lora_from_folders",
    "fuse_into_folder",
    "load_adapter",
    "lora_hashes_infotext",
    "match_targets",
    "merge_cat",
    "merge_linear",
    "merge_svd",
    "named_weight_shapes_of",
    "parse_state_dict",
    "whole_file_sha256",
]
