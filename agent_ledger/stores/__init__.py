"""Stores keep effects; the ledger decides what to do with them. See ``base.EffectStore``."""

from .base import BeginRecord, EffectStore, NewEffect, TransitionRecord

__all__ = ["BeginRecord", "EffectStore", "NewEffect", "TransitionRecord"]
