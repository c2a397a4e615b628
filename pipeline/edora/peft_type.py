"""Add EDORA to PEFT's closed `PeftType` enum so `register_peft_method` accepts it.

PEFT 0.21 only registers methods whose name is already a `PeftType` member; a plugin has to extend the enum. This is
the one place that touches PEFT internals; it is idempotent and checked by the tests on every supported Python.
"""

from peft.utils.peft_types import PeftType


def _extend_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members; bypass it once
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


EDORA = _extend_peft_type("EDORA")
