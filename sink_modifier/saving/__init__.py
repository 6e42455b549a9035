"""Writing outputs: the save plan that rides on ``save_pretrained`` (``report``), the rules for writing into a
directory (``publish``), what this package wrote there (``manifest``) and the writer's lock (``locks``).

The library's save path (``oneshot(output_dir=...)``) and the command line share these rules, so they live
below both: a save never deletes or replaces a file this package did not write.
"""
