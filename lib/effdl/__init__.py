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
- :mod:`effdl.checks`    — what every exercise check shares; :mod:`effdl.grade` and
  :mod:`effdl.student` for instructors
- :mod:`effdl.accuracy`  — flash-attention's 2×/3× accuracy rule for low-precision kernels
- :mod:`effdl.reference` — plain reference implementations several chapters use (naive attention)
- :mod:`effdl.chapters`  — the chapter contract: how core code finds a chapter by its name
- one package per chapter, ``effdl.<chapter>`` (``measuring``, ``attention``, ``distill``,
  ``tokens``, ...), each with ``sizes``, ``bench``, ``checks``, ``plots`` and ``experiments``
"""

import pkgutil as _pkgutil

# why: a chapter package may also live in an ``effdl/`` folder elsewhere on ``sys.path`` (a
# chapter in development, or the test that adds a throw-away chapter); core code finds it by name
__path__ = _pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"
