"""The CI context of a run: a few named variables from GitHub Actions, GitLab CI or a generic CI.

Only the variables listed here are read, never whole environments, and the result is redacted
again by the recorder like any other data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

_GITHUB = {
    "run_id": "GITHUB_RUN_ID",
    "run_attempt": "GITHUB_RUN_ATTEMPT",
    "run_number": "GITHUB_RUN_NUMBER",
    "sha": "GITHUB_SHA",
    "ref": "GITHUB_REF",
    "workflow": "GITHUB_WORKFLOW",
    "job": "GITHUB_JOB",
    "actor": "GITHUB_ACTOR",
    "repository": "GITHUB_REPOSITORY",
    "event_name": "GITHUB_EVENT_NAME",
    "server_url": "GITHUB_SERVER_URL",
}
_GITLAB = {
    "pipeline_id": "CI_PIPELINE_ID",
    "job_id": "CI_JOB_ID",
    "job_name": "CI_JOB_NAME",
    "sha": "CI_COMMIT_SHA",
    "ref": "CI_COMMIT_REF_NAME",
    "project": "CI_PROJECT_PATH",
    "pipeline_url": "CI_PIPELINE_URL",
    "actor": "GITLAB_USER_LOGIN",
}
_GENERIC = {
    "build_id": "BUILD_ID",
    "build_number": "BUILD_NUMBER",
    "build_url": "BUILD_URL",
    "build_tag": "BUILD_TAG",
}


def ci_context(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`{"provider": ..., ...}` for the CI system the process runs under; `{}` outside CI."""
    env = os.environ if environ is None else environ
    if env.get("GITHUB_ACTIONS") == "true":
        out = {"provider": "github"} | _pick(env, _GITHUB)
        if {"server_url", "repository", "run_id"} <= out.keys():
            out["run_url"] = f"{out['server_url']}/{out['repository']}/actions/runs/{out['run_id']}"
        return out
    if env.get("GITLAB_CI") == "true":
        return {"provider": "gitlab"} | _pick(env, _GITLAB)
    generic = _pick(env, _GENERIC)
    if env.get("CI", "").lower() in {"true", "1", "yes"} or generic:
        return {"provider": "generic"} | generic
    return {}


def _pick(env: Mapping[str, str], names: Mapping[str, str]) -> dict[str, str]:
    return {key: env[var][:500] for key, var in names.items() if env.get(var)}
