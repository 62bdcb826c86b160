"""Clinical logic: the conversation and prompt templates, the structured consultation and its report
(Markdown, PDF), red-flag triage, the calibrated differential head, Fitzpatrick skin types, case records."""
