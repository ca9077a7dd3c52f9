"""Midjourney's buttons: what a button's custom id does. Shared by the providers' clients
and the simulator, which plays them."""

from __future__ import annotations

# A button's custom id names its action somewhere in it: MJ::JOB::upsample::1::<hash>,
# MJ::JOB::high_variation::1::…, MJ::Outpaint::50::1::…, MJ::CustomZoom::…, MJ::JOB::pan_left::…,
# MJ::Inpaint::1::… (Vary Region)
_BUTTON_MARKERS = (("upsample", "UPSCALE"), ("variation", "VARIATION"), ("reroll", "REROLL"),
                   ("outpaint", "ZOOM"), ("customzoom", "ZOOM"), ("pan_", "PAN"),
                   ("inpaint", "VARIATION"))


def button_action(custom_id: str) -> str | None:
    """The action a button performs, from its custom id."""
    lowered = custom_id.lower()
    return next((action for marker, action in _BUTTON_MARKERS if marker in lowered), None)
