"""Training data: read sources, recognise their format, lint rows, mix and split.

Flow: `sources.read_rows` yields raw rows with their file and line -> `formats.to_conversation`
turns each into a `Conversation` (or raises a DataError naming the row) -> `mixing.mix_and_split`
weights, shuffles and holds out the eval split. No torch and no tokenizer here.
"""

from .conversation import Conversation, Message
from .loading import LoadedData, SourceReport, load_data

__all__ = ["Conversation", "LoadedData", "Message", "SourceReport", "load_data"]
