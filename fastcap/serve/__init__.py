"""fastcap-serve: the web page and JSON API over a captioner."""
