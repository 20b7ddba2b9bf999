"""dm-engine: a structured-concurrency engine that keeps an AI Dungeon Master fast.

This module only re-exports the public API; the implementation lives in one module
per concept (see docs/architecture.md).
"""

from .agents.base import Agent as Agent
from .agents.base import AgentOutput as AgentOutput
from .agents.base import AgentRequest as AgentRequest
from .agents.base import AgentResponse as AgentResponse
from .agents.base import Status as Status
from .agents.base import Usage as Usage
from .agents.http import AnthropicAgent as AnthropicAgent
from .agents.http import HTTPAgentError as HTTPAgentError
from .agents.http import OpenAIChatAgent as OpenAIChatAgent
from .agents.http import RetryPolicy as RetryPolicy
from .agents.http import make_http_agent as make_http_agent
from .agents.retrieval import RetrievalFirstAgent as RetrievalFirstAgent
from .agents.schemas import StructuredAnswerError as StructuredAnswerError
from .agents.simulated import SimulatedAgent as SimulatedAgent
from .benchmark.suite import PerformanceBenchmark as PerformanceBenchmark
from .classify import classify_action as classify_action
from .config import Config as Config
from .config import LatencyTarget as LatencyTarget
from .config import ServerConfig as ServerConfig
from .config import load_config as load_config
from .content.cache import CacheStats as CacheStats
from .content.cache import ModuleCache as ModuleCache
from .content.context import ContextResult as ContextResult
from .content.context import OptimizedContextBuilder as OptimizedContextBuilder
from .content.lazy import LazyLoadManager as LazyLoadManager
from .content.store import ModuleStore as ModuleStore
from .content.store import open_module as open_module
from .content.tokens import ApproxTokenCounter as ApproxTokenCounter
from .content.tokens import TokenCounter as TokenCounter
from .errors import AgentError as AgentError
from .errors import ConfigError as ConfigError
from .errors import DependencyError as DependencyError
from .errors import EngineError as EngineError
from .errors import LoadError as LoadError
from .errors import ModuleError as ModuleError
from .errors import SessionError as SessionError
from .observability.metrics import MetricsExporter as MetricsExporter
from .observability.profiler import PerformanceProfiler as PerformanceProfiler
from .observability.profiler import PerformanceReport as PerformanceReport
from .observability.profiler import Span as Span
from .observability.report import write_report as write_report
from .observability.spanlog import SpanLog as SpanLog
from .observability.spanlog import read_span_log as read_span_log
from .pipeline import ActionResult as ActionResult
from .pipeline import DungeonMaster as DungeonMaster
from .runtime import open_engine as open_engine
from .scheduling.executor import ParallelAgentExecutor as ParallelAgentExecutor
from .scheduling.hedging import HedgePolicy as HedgePolicy
from .state import SessionStore as SessionStore
from .streaming import ActionStream as ActionStream
