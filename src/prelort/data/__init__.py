"""Data: sources, prompt formatting, label masking and non-IID partitioning."""

from prelort.data.examples import DataError, Example
from prelort.data.formatting import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    collate,
    encode_answer,
    encode_example,
    encode_prompt,
    format_prompt,
    has_chat_template,
)
from prelort.data.partition import PARTITION_SCHEMES, partition_indices, train_test_split
from prelort.data.records import DOLLY_FIELDS
from prelort.data.sources import (
    DATA_DIR_ENV,
    SOURCES,
    bbc_news_dir,
    default_data_dir,
    load_bbc_news,
    load_hub,
    load_local,
    load_multiple_choice,
    load_natural_instructions,
    load_source,
    register_source,
)

__all__ = [
    "DATA_DIR_ENV",
    "DOLLY_FIELDS",
    "IGNORE_INDEX",
    "PARTITION_SCHEMES",
    "PLAIN_TEMPLATE",
    "SOURCES",
    "DataError",
    "Example",
    "bbc_news_dir",
    "collate",
    "default_data_dir",
    "encode_answer",
    "encode_example",
    "encode_prompt",
    "format_prompt",
    "has_chat_template",
    "load_bbc_news",
    "load_hub",
    "load_local",
    "load_multiple_choice",
    "load_natural_instructions",
    "load_source",
    "partition_indices",
    "register_source",
    "train_test_split",
]
