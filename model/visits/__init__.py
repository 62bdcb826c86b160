"""Visits kept when the clinic asks (`--records DIR`): encrypted at rest, a follow-up's earlier photo, FHIR export."""
