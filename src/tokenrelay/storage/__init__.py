"""Where conversations are kept: SQLite by default, PostgreSQL by URL, migrated by Alembic."""

from tokenrelay.storage.conversations import (
    ConversationDetail,
    ConversationNotFound,
    ConversationPage,
    ConversationRecord,
    ConversationStore,
    InvalidCursor,
    MessageNotFound,
    MessageRecord,
)
from tokenrelay.storage.database import Database, default_database_url
from tokenrelay.storage.models import MessageRole, MessageStatus

__all__ = [
    "ConversationDetail",
    "ConversationNotFound",
    "ConversationPage",
    "ConversationRecord",
    "ConversationStore",
    "Database",
    "InvalidCursor",
    "MessageNotFound",
    "MessageRecord",
    "MessageRole",
    "MessageStatus",
    "default_database_url",
]
