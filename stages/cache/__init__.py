"""The cache contract: the layout (stages.cache.layout, with the kinds of stages.kinds), the
format's checks (stages.cache.format), the writer (stages.cache.writer) and the reader (stages.cache.reader). The names below are the
package's public interface."""

from stages.cache.format import FORMAT, SCHEMA_VERSION, Rows, all_finite, is_cache, malformed_attributes
from stages.cache.layout import ChunkGrid, Layout, default_chunk_rows
from stages.cache.reader import CacheReader, batch_bounds, prefetch
from stages.cache.writer import CacheWriter, open_writer, writing
from stages.kinds import index_dtype

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "CacheReader", "CacheWriter", "ChunkGrid", "Layout", "Rows", "all_finite", "batch_bounds",
    "default_chunk_rows", "index_dtype", "is_cache", "malformed_attributes", "open_writer", "prefetch", "writing",
]
