from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckRequest(_message.Message):
    __slots__ = ("guard", "phase", "route", "consumer", "model", "texts")
    GUARD_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    guard: str
    phase: str
    route: str
    consumer: str
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, guard: _Optional[str] = ..., phase: _Optional[str] = ..., route: _Optional[str] = ..., consumer: _Optional[str] = ..., model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("action", "texts", "reason")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[CheckResponse.Action]
        PASS: _ClassVar[CheckResponse.Action]
        MASK: _ClassVar[CheckResponse.Action]
        REJECT: _ClassVar[CheckResponse.Action]
    ACTION_UNSPECIFIED: CheckResponse.Action
    PASS: CheckResponse.Action
    MASK: CheckResponse.Action
    REJECT: CheckResponse.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    action: CheckResponse.Action
    texts: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, action: _Optional[_Union[CheckResponse.Action, str]] = ..., texts: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...
