"""The fine-tuning methods and recipes on top of the operation: the token-loss presets
(:mod:`.presets`, re-exported here: ``sftkey.methods.dft``, ``.asft``, ...), key-answer spans
and SFTKey's stages (:mod:`.keys`, :mod:`.data`, :mod:`.trainer`), CFT's critical tokens
(:mod:`.critical`, :mod:`.answers`), SED-SFT's gate (:mod:`.sed`) and EAFT's weights (:mod:`.eaft`)."""
from .presets import *  # noqa: F401,F403
from .presets import __all__  # noqa: F401
