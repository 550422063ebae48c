"""The library behind the `pipeline` CLI: the cache contract, the two stages and the losses.

Usable from Python without the CLI:

    from stages import cache_teacher, train_student
    cache_teacher.run(cache_teacher.CacheTeacherConfig(...), teacher=my_module, split=my_split)
"""

__version__ = "0.2.0"
