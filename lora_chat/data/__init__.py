"""Training data: read sources, recognise their format, lint rows, mix and split.

Flow: `sources.read_rows` yields raw rows with their file and line -> `formats.to_conversation`
turns each into a `Conversation` (or raises a DataError naming the row) -> `loading.load_data`
reports each source, holds out the eval split over distinct conversations, then weights the train
rows. No torch and no tokenizer here.
"""

from .conversation import Conversation, Message
from .loading import LoadedData, SourceReport, load_data

__all__ = ["Conversation", "LoadedData", "Message", "SourceReport", "load_data"]
