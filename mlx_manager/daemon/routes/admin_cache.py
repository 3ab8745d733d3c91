"""Admin endpoints for the prompt cache: what it holds and does (`cache stats`), and clearing it
(`cache clear`). Protected like the model endpoints: the admin token from this machine, or any
API key.

    GET    /admin/cache     per loaded model: entries, bytes, hits, misses, cached tokens; the disk tier
    DELETE /admin/cache     forget every entry, in memory and on disk; how many went
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from mlx_manager.daemon.routes.admin import require_admin_or_key
from mlx_manager.daemon.state import Daemon
from mlx_manager.engine.prompt_cache_disk import clear_folder, folder_usage

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin_or_key)])


class ModelCache(BaseModel):
    model: str
    entries: int
    bytes: int
    hits: int = Field(description="prompts that reused a cached prefix")
    misses: int
    cached_tokens: int = Field(description="prompt tokens not computed again, in all")
    hit_rate: float | None = Field(description="hits / (hits + misses); null before the first prompt")
    disk_entries: int
    disk_bytes: int


class CacheReport(BaseModel):
    enabled: bool = Field(description="cache.max_bytes and cache.max_entries above 0")
    max_bytes: int = Field(description="cache.max_bytes: each model's limit in memory")
    max_entries: int
    disk: bool = Field(description="cache.disk: entries kept on disk too")
    disk_entries: int = Field(description="every model's entries on disk, loaded or not")
    disk_bytes: int
    models: list[ModelCache]


class Cleared(BaseModel):
    cleared: int = Field(description="entries that went, in memory and on disk")


@router.get("/admin/cache", response_model=CacheReport)
async def cache_stats(daemon: Daemon) -> CacheReport:
    settings = daemon.settings
    disk_entries, disk_bytes = folder_usage(settings.prompt_cache_folder())
    models = []
    for m in daemon.engine.status().models:
        c = m.cache
        asked = c.hits + c.misses
        models.append(
            ModelCache(
                model=m.model_id,
                entries=c.entries,
                bytes=c.bytes,
                hits=c.hits,
                misses=c.misses,
                cached_tokens=c.cached_tokens,
                hit_rate=c.hits / asked if asked else None,
                disk_entries=c.disk_entries,
                disk_bytes=c.disk_bytes,
            )
        )
    return CacheReport(
        enabled=settings.cache.max_bytes > 0 and settings.cache.max_entries > 0,
        max_bytes=settings.cache.max_bytes,
        max_entries=settings.cache.max_entries,
        disk=settings.cache.disk,
        disk_entries=disk_entries,
        disk_bytes=disk_bytes,
        models=models,
    )


@router.delete("/admin/cache", response_model=Cleared)
async def cache_clear(daemon: Daemon) -> Cleared:
    cleared = await daemon.engine.clear_cache()
    # Models not loaded now may have entries on disk: they go too.
    cleared += clear_folder(daemon.settings.prompt_cache_folder())
    return Cleared(cleared=cleared)
