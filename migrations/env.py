"""Alembic environment for nicd.

nicd runs migrations from code (``nicd db upgrade``, see ``nicd/store/migrate.py``), handing a connection
in ``config.attributes["connection"]``. The plain ``alembic`` command works too, with the URL from
``alembic.ini`` or ``-x url=...``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from nicd.store.models import NAMING_CONVENTION, Base

config = context.config
target_metadata = Base.metadata


def _configure(**kw) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite has almost no ALTER: autogenerate emits move-and-copy batches
        compare_type=True,
        **kw,
    )


def run_migrations_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    section = dict(config.get_section(config.config_ini_section) or {})
    section["sqlalchemy.url"] = url
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        _configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()


assert NAMING_CONVENTION  # the models' MetaData carries it; batch ops reuse it through target_metadata

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
