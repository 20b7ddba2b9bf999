"""dm-engine: a structured-concurrency engine that keeps an AI Dungeon Master fast."""

from .config import Config as Config
from .config import load_config as load_config
from .errors import AgentError as AgentError
from .errors import ConfigError as ConfigError
from .errors import DependencyError as DependencyError
from .errors import EngineError as EngineError
from .errors import LoadError as LoadError
from .errors import ModuleError as ModuleError
from .errors import SessionError as SessionError
