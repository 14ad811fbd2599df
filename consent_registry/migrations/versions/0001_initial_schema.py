"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('audit_event',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=48), nullable=False),
    sa.Column('message_id', sa.String(length=32), nullable=True),
    sa.Column('queue_id', sa.Integer(), nullable=True),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('consent_id', sa.Integer(), nullable=True),
    sa.Column('username', sa.String(length=64), nullable=True),
    sa.Column('recipient', sa.String(length=320), nullable=True),
    sa.Column('decision', sa.String(length=16), nullable=True),
    sa.Column('reason', sa.String(length=48), nullable=True),
    sa.Column('detail', sa.String(length=500), nullable=True),
    sa.Column('prev_hash', sa.String(length=64), nullable=True),
    sa.Column('hash', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_event_action'), ['action'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_event_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_event_patient_id'), ['patient_id'], unique=False)

    op.create_table('patient',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('mrn', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('mrn')
    )
    op.create_table('queue_message',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('mail_from', sa.String(length=320), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=True),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('is_bounce', sa.Boolean(), nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('queue_message', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_queue_message_received_at'), ['received_at'], unique=False)

    op.create_table('recipient_certificate',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('address_key', sa.String(length=320), nullable=False),
    sa.Column('fingerprint_sha256', sa.String(length=64), nullable=False),
    sa.Column('subject', sa.String(length=1000), nullable=False),
    sa.Column('issuer', sa.String(length=1000), nullable=False),
    sa.Column('serial', sa.String(length=80), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('imported_by', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('address_key', 'fingerprint_sha256')
    )
    with op.batch_alter_table('recipient_certificate', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_recipient_certificate_address_key'), ['address_key'], unique=False)

    op.create_table('user_account',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.Text(), nullable=False),
    sa.Column('disabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('disabled_by', sa.String(length=128), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('username')
    )
    op.create_table('consent',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('address_key', sa.String(length=320), nullable=False),
    sa.Column('clinician_id', sa.Integer(), nullable=True),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('evidence', sa.String(length=500), nullable=True),
    sa.Column('valid_from', sa.Date(), nullable=False),
    sa.Column('expires', sa.Date(), nullable=True),
    sa.Column('delivery', sa.String(length=16), nullable=False),
    sa.Column('risk_acknowledged', sa.Boolean(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recorded_by', sa.String(length=128), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_by', sa.String(length=128), nullable=True),
    sa.Column('revoke_reason', sa.String(length=500), nullable=True),
    sa.ForeignKeyConstraint(['clinician_id'], ['user_account.id'], ),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consent', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consent_address_key'), ['address_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_consent_patient_id'), ['patient_id'], unique=False)

    op.create_table('patient_address',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('address_key', sa.String(length=320), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('added_by', sa.String(length=128), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('address_key')
    )
    with op.batch_alter_table('patient_address', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patient_address_patient_id'), ['patient_id'], unique=False)

    op.create_table('queue_recipient',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.String(length=32), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('claimed_by', sa.String(length=128), nullable=True),
    sa.Column('claimed_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['queue_message.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('queue_recipient', schema=None) as batch_op:
        batch_op.create_index('ix_queue_recipient_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_queue_recipient_message_id'), ['message_id'], unique=False)

    op.create_table('relationship',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('clinician_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('since', sa.Date(), nullable=False),
    sa.Column('ended_on', sa.Date(), nullable=True),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recorded_by', sa.String(length=128), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ended_by', sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(['clinician_id'], ['user_account.id'], ),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('relationship', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_relationship_clinician_id'), ['clinician_id'], unique=False)
        batch_op.create_index('ix_relationship_patient_clinician', ['patient_id', 'clinician_id'], unique=False)

    op.create_table('user_address',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('address_key', sa.String(length=320), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['user_account.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('address_key')
    )
    with op.batch_alter_table('user_address', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_address_user_id'), ['user_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('user_address', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_user_address_user_id'))

    op.drop_table('user_address')
    with op.batch_alter_table('relationship', schema=None) as batch_op:
        batch_op.drop_index('ix_relationship_patient_clinician')
        batch_op.drop_index(batch_op.f('ix_relationship_clinician_id'))

    op.drop_table('relationship')
    with op.batch_alter_table('queue_recipient', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_queue_recipient_message_id'))
        batch_op.drop_index('ix_queue_recipient_due')

    op.drop_table('queue_recipient')
    with op.batch_alter_table('patient_address', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_patient_address_patient_id'))

    op.drop_table('patient_address')
    with op.batch_alter_table('consent', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consent_patient_id'))
        batch_op.drop_index(batch_op.f('ix_consent_address_key'))

    op.drop_table('consent')
    op.drop_table('user_account')
    with op.batch_alter_table('recipient_certificate', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_recipient_certificate_address_key'))

    op.drop_table('recipient_certificate')
    with op.batch_alter_table('queue_message', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_queue_message_received_at'))

    op.drop_table('queue_message')
    op.drop_table('patient')
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_event_patient_id'))
        batch_op.drop_index(batch_op.f('ix_audit_event_at'))
        batch_op.drop_index(batch_op.f('ix_audit_event_action'))

    op.drop_table('audit_event')

