"""The duplex floor: live sessions (`DuplexSession`), recorded-stream replay, metrics and evaluation.

`processing/` prepares each 1-s unit (`processor.duplex_unit`), `modeling/` computes it (the model's `duplex_*`
methods); this package strings units into a session and measures sessions. Entry points:
`python -m minicpmo.duplex.replay` (a recording through a session) and `python -m minicpmo.duplex.evaluate`
(timing metrics over synthetic episodes).
"""

from .duplex_config import DuplexConfig, DuplexConfigError, DuplexOutput
from .duplex_session import STAGES, DuplexSession, DuplexSessionClosedError, DuplexState, duplex_step

__all__ = ["STAGES", "DuplexConfig", "DuplexConfigError", "DuplexOutput", "DuplexSession",
           "DuplexSessionClosedError", "DuplexState", "duplex_step"]
