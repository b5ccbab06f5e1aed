"""The schema as ``create_all`` made it before migrations (``schema_info`` version 1).

State files made then hold these tables already: every step here creates only
what is missing, so such a file is migrated like an empty one, its data kept.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.migrations import idempotent

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    created = idempotent.create_table('schema_info',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    if created:
        op.bulk_insert(sa.table('schema_info', sa.column('id'), sa.column('version')), [{'id': 1, 'version': 1}])
    idempotent.create_table('account_link',
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('identity_key', sa.String(), nullable=False),
    sa.Column('scim_id', sa.String(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('etag', sa.String(), nullable=True),
    sa.Column('location', sa.String(), nullable=True),
    sa.Column('applied_hash', sa.String(), nullable=True),
    sa.Column('applied', sa.String(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('target', 'identity_key')
    )
    idempotent.create_index('ux_account_link_scim_id', 'account_link', ['target', 'scim_id'], unique=True)

    idempotent.create_table('alert_state',
    sa.Column('key', sa.String(), nullable=False),
    sa.Column('rule', sa.String(), nullable=False),
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('severity', sa.String(), nullable=False),
    sa.Column('fingerprint', sa.String(), nullable=False),
    sa.Column('level', sa.Integer(), nullable=False),
    sa.Column('message', sa.String(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('first_fired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('key')
    )
    idempotent.create_index('ix_alert_state_target', 'alert_state', ['target'], unique=False)

    idempotent.create_table('group_link',
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('group_key', sa.String(), nullable=False),
    sa.Column('scim_id', sa.String(), nullable=False),
    sa.Column('display_name', sa.String(), nullable=False),
    sa.Column('etag', sa.String(), nullable=True),
    sa.Column('verified_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('target', 'group_key')
    )
    idempotent.create_table('group_member_state',
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('group_key', sa.String(), nullable=False),
    sa.Column('member_id', sa.String(), nullable=False),
    sa.Column('identity_key', sa.String(), nullable=True),
    sa.PrimaryKeyConstraint('target', 'group_key', 'member_id')
    )
    idempotent.create_table('operation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.String(), nullable=False),
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('identity_key', sa.String(), nullable=False),
    sa.Column('kind', sa.String(), nullable=False),
    sa.Column('reason', sa.String(), nullable=False),
    sa.Column('status', sa.String(), nullable=False),
    sa.Column('payload', sa.String(), nullable=True),
    sa.Column('payload_hash', sa.String(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_http_status', sa.Integer(), nullable=True),
    sa.Column('last_scim_type', sa.String(), nullable=True),
    sa.Column('last_detail', sa.String(), nullable=True),
    sa.Column('last_error', sa.String(), nullable=True),
    sa.Column('note', sa.String(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    idempotent.create_index('ix_operation_account', 'operation', ['target', 'identity_key'], unique=False)
    idempotent.create_index('ix_operation_due', 'operation', ['target', 'status', 'next_attempt_at'], unique=False)
    idempotent.create_index('ix_operation_run_id', 'operation', ['run_id'], unique=False)

    idempotent.create_table('run',
    sa.Column('id', sa.String(), nullable=False),
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(), nullable=False),
    sa.Column('counts', sa.String(), nullable=True),
    sa.Column('error', sa.String(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    idempotent.create_index('ix_run_target', 'run', ['target'], unique=False)

    idempotent.create_table('target_state',
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('paused', sa.Boolean(), nullable=False),
    sa.Column('pause_note', sa.String(), nullable=True),
    sa.Column('quarantined', sa.Boolean(), nullable=False),
    sa.Column('quarantine_reason', sa.String(), nullable=True),
    sa.Column('probe_interval', sa.Float(), nullable=False),
    sa.Column('next_probe_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('failing_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(), nullable=True),
    sa.Column('auth_failures', sa.Integer(), nullable=False),
    sa.Column('failed_rounds', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('target')
    )
    idempotent.create_table('attempt',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('operation_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('duration_ms', sa.Float(), nullable=False),
    sa.Column('method', sa.String(), nullable=True),
    sa.Column('url', sa.String(), nullable=True),
    sa.Column('http_status', sa.Integer(), nullable=True),
    sa.Column('scim_type', sa.String(), nullable=True),
    sa.Column('detail', sa.String(), nullable=True),
    sa.Column('error', sa.String(), nullable=True),
    sa.Column('request_body', sa.String(), nullable=True),
    sa.Column('response_body', sa.String(), nullable=True),
    sa.ForeignKeyConstraint(['operation_id'], ['operation.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    idempotent.create_index('ix_attempt_operation_id', 'attempt', ['operation_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('attempt', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_attempt_operation_id'))

    op.drop_table('attempt')
    op.drop_table('target_state')
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_run_target'))

    op.drop_table('run')
    with op.batch_alter_table('operation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_operation_run_id'))
        batch_op.drop_index('ix_operation_due')
        batch_op.drop_index('ix_operation_account')

    op.drop_table('operation')
    op.drop_table('group_member_state')
    op.drop_table('group_link')
    with op.batch_alter_table('alert_state', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alert_state_target'))

    op.drop_table('alert_state')
    with op.batch_alter_table('account_link', schema=None) as batch_op:
        batch_op.drop_index('ux_account_link_scim_id')

    op.drop_table('account_link')
    op.drop_table('schema_info')
