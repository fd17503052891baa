"""The interactive-session API: ``POST /v1/chat/interactive`` (LMDeploy 0.9 compatible)."""
