"""The cache contract: the format (stages.cache.format, with the kinds of stages.kinds), the
writer (stages.cache.writer) and the reader (stages.cache.reader). The names below are the
package's public interface."""

from stages.cache.format import (
    FORMAT, SCHEMA_VERSION, ChunkGrid, Layout, Rows, all_finite, default_chunk_rows, is_cache, malformed_attributes,
)
from stages.cache.reader import CacheReader, batch_bounds, prefetch
from stages.cache.writer import CacheWriter, open_writer, writing
from stages.kinds import index_dtype

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "CacheReader", "CacheWriter", "ChunkGrid", "Layout", "Rows", "all_finite", "batch_bounds",
    "default_chunk_rows", "index_dtype", "is_cache", "malformed_attributes", "open_writer", "prefetch", "writing",
]
