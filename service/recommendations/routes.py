"""/v1/recommendations: thin handlers; the logic is in service.recommendations.service."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from service.api.cached_reads import BODY_DIGEST
from service.api.deps import ReadSession, State, WriteSession
from service.db.session import session_scope
from service.errors import error_responses
from service.recommendations import service as use_cases
from service.schemas import RecommendationCreate, RecommendationOut, RecommendationPage, TrialOut
from service.state import AppState
from service.status import FINISHED, JobStatus

router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"])

ANSWER_MEMO_TTL_S = 10.0  # a repeated POST may miss a newer (forced) answer for at most this long

JOB_PATH = "/v1/recommendations/{recommendation_id}"
RecommendationId = Annotated[str, Path(min_length=1, max_length=64, description="The recommendation's id.")]


@router.post(
    "",
    response_model=RecommendationOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Ask for a batch size recommendation",
    description=(
        "Queues a probe and answers `202` with the job. When an identical request (same fingerprint) "
        "already succeeded, answers `200` with the stored result instead, unless `force` is set; when an "
        "identical one is queued or running, answers `202` with that job."
    ),
    responses={
        200: {"model": RecommendationOut, "description": "An identical request already succeeded."},
        **error_responses(400, 401, 413, 422),
    },
)
async def create_recommendation(payload: RecommendationCreate, state: State, request: Request) -> Response:
    # A repeated request that already succeeded is answered from memory (the same bytes again even before
    # routing: api.cached_reads); the rest validates and queries in a thread.
    key = use_cases.answer_key(payload)
    digest = None if payload.force else request.scope.get(BODY_DIGEST)
    if key is not None and payload.force:
        state.answered_requests.pop(key)
    elif key is not None and (answer := state.memoised_answer(key)) is not None:
        _remember_body(state, digest, key)
        return _job_response(answer[1], answer[0], status.HTTP_200_OK)
    job, created = await run_in_threadpool(
        use_cases.create_recommendation,
        reads=state.reads,
        writes=state.writes,
        payload=payload,
        host=state.host,
        settings=state.settings,
    )
    body = RecommendationOut.model_validate(job).model_dump_json().encode()
    if job["status"] == JobStatus.SUCCEEDED and not created:
        state.finished_jobs.put(job["id"], body)
        if key is not None:
            state.answered_requests.put(key, (job["id"], time.monotonic() + ANSWER_MEMO_TTL_S))
            _remember_body(state, digest, key)
        return _job_response(body, job["id"], status.HTTP_200_OK)
    return _job_response(body, job["id"], status.HTTP_202_ACCEPTED)


def _remember_body(state: AppState, digest: str | None, key: str) -> None:
    """These body bytes validate to request `key`: api.cached_reads may answer them again without parsing."""
    if digest is not None:
        state.request_keys.put(digest, key)


def _job_response(body: bytes, recommendation_id: str, status_code: int) -> Response:
    return Response(
        body,
        status_code=status_code,
        media_type="application/json",
        headers={"Location": f"/v1/recommendations/{recommendation_id}"},
    )


@router.get(
    "",
    response_model=RecommendationPage,
    summary="List recommendations, newest first",
    responses=error_responses(401, 422),
)
def list_recommendations(
    session: ReadSession,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    model: Annotated[str | None, Query(max_length=128, description="Zoo model name.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> dict:
    items, total = use_cases.list_recommendations(
        session, status=status_filter, model_name=model, limit=limit, offset=offset
    )
    return {
        "items": items,
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get(
    "/{recommendation_id}",  # JOB_PATH; service.api.cached_reads answers cached reads of it before routing
    response_model=RecommendationOut,
    summary="Get a recommendation: status, live progress, result or error",
    responses=error_responses(401, 404, 422),
)
async def get_recommendation(recommendation_id: RecommendationId, request: Request) -> Response:
    # async with a cache in front: a finished job never changes, so polling it costs no thread or query.
    # The state comes from the request, not the State dependency: the hottest route resolves none.
    state: AppState = request.app.state.batchsize
    if (body := state.finished_jobs.get(recommendation_id)) is None:
        body = await run_in_threadpool(_read_job_json, state, recommendation_id)
    return Response(body, media_type="application/json")


def _read_job_json(state: AppState, recommendation_id: str) -> bytes:
    with session_scope(state.reads) as session:
        job = RecommendationOut.model_validate(
            use_cases.to_public(use_cases.get_recommendation(session, recommendation_id))
        )
    body = job.model_dump_json().encode()
    if job.status in FINISHED:  # the stored job never changes
        state.finished_jobs.put(recommendation_id, body)
    return body


@router.get(
    "/{recommendation_id}/trials",
    response_model=list[TrialOut],
    summary="Every probe trial of a recommendation, in order",
    responses=error_responses(401, 404, 422),
)
def list_trials(recommendation_id: RecommendationId, session: ReadSession) -> list:
    return use_cases.list_trials(session, recommendation_id)


@router.delete(
    "/{recommendation_id}",
    response_model=RecommendationOut,
    summary="Cancel a queued or running recommendation",
    description="A queued job is cancelled at once; a running one is stopped by its worker within seconds.",
    responses=error_responses(401, 404, 409, 422),
)
def cancel_recommendation(recommendation_id: RecommendationId, session: WriteSession) -> dict:
    return use_cases.to_public(use_cases.cancel_recommendation(session, recommendation_id))
