"""effdl — the library behind the course "Naive to Fast".

Every implementation the chapters show lives here, tested; a chapter renders the source with
:func:`effdl.show.show_source` and calls it.  Modules, one per job:

- :mod:`effdl.profile`   — ``smoke | cpu | gpu`` and the sizes each chapter reads
- :mod:`effdl.measure`   — timing, peak memory, FLOP counting, result records
- :mod:`effdl.bench`     — ``python -m effdl.bench CHAPTER`` benchmark harness
- :mod:`effdl.data`      — image datasets (Hugging Face hub or offline digits)
- :mod:`effdl.show`      — render library source in a page
- :mod:`effdl.plot`      — small plotting helpers with labelled axes
- :mod:`effdl.device`    — what the current accelerator supports
- :mod:`effdl.checks`    — exercise checks; :mod:`effdl.grade` and :mod:`effdl.student` for instructors
- technique modules: :mod:`effdl.roofline`, :mod:`effdl.attention`, :mod:`effdl.distill`,
  :mod:`effdl.tokens`
"""

__version__ = "0.1.0"
