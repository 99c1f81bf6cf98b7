"""streamring: consume LLM token streams (SSE) at high throughput.

`pipeline` is the one import a user needs: build a pipeline, then run streams in this process
(`collect`, `process_stream`, `stream_request`) or across processes (`pool`).
"""

from .core import PipelineBuilder, StreamingPipeline, StreamSession
from .errors import ERROR_KINDS, StreamError
from .sse import SseEvent, SseParser
from .tokens import (
    Delta,
    Done,
    Error,
    Finish,
    FunctionCall,
    RawEvent,
    Reasoning,
    Refusal,
    ServerTool,
    StreamResult,
    StreamToken,
    Text,
    ToolCall,
    Usage,
    merge,
)
from .transformers import (
    ContentFilter,
    Emit,
    Fail,
    Pass,
    Replace,
    Skip,
    StopSequence,
    StreamTransformer,
    TokenAccumulator,
)

__version__ = "0.1.0"

__all__ = [
    "ERROR_KINDS",
    "ContentFilter",
    "Delta",
    "Done",
    "Emit",
    "Error",
    "Fail",
    "Finish",
    "FunctionCall",
    "Pass",
    "PipelineBuilder",
    "RawEvent",
    "Reasoning",
    "Refusal",
    "Replace",
    "ServerTool",
    "Skip",
    "SseEvent",
    "SseParser",
    "StopSequence",
    "StreamError",
    "StreamResult",
    "StreamSession",
    "StreamToken",
    "StreamTransformer",
    "StreamingPipeline",
    "Text",
    "TokenAccumulator",
    "ToolCall",
    "Usage",
    "merge",
]
