"""Services: long-running asynchronous work, its status, error handling and polling,
and the ServiceManager that runs services on the caller's loop or in threads."""

from eventmill.services.error_handlers import (
    ConstantBackoff,
    ContinueDecision,
    ContinueErrorHandler,
    ErrorDecision,
    ErrorHandler,
    ErrorHandlingService,
    ExitDecision,
    ExitErrorHandler,
    ExponentialBackoff,
    RaiseDecision,
    RaiseErrorHandler,
    RetryBackoff,
    RetryDecision,
    RetryErrorHandler,
    TypeMappingErrorHandler,
)
from eventmill.services.manager import ExecutionMode, IsolationMode, ServiceManager
from eventmill.services.polling import PollingService
from eventmill.services.service import CallableService, Service
from eventmill.services.status import Process, ProcessStatus, combine_statuses

__all__ = [
    "CallableService",
    "ConstantBackoff",
    "ContinueDecision",
    "ContinueErrorHandler",
    "ErrorDecision",
    "ErrorHandler",
    "ErrorHandlingService",
    "ExitDecision",
    "ExecutionMode",
    "ExitErrorHandler",
    "ExponentialBackoff",
    "IsolationMode",
    "PollingService",
    "Process",
    "ProcessStatus",
    "RaiseDecision",
    "RaiseErrorHandler",
    "RetryBackoff",
    "RetryDecision",
    "RetryErrorHandler",
    "Service",
    "ServiceManager",
    "TypeMappingErrorHandler",
    "combine_statuses",
]
