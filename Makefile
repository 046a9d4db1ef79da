# The two set-up commands of the README's Quickstart.
.PHONY: run test fmt lint models

run:            ## fetch models, build release, start worker + gateway, print a demo key
	@scripts/run-stack.sh

test:           ## every test: format, lints, unit, Postgres and end-to-end
	@scripts/test.sh

models:         ## fetch and verify the two models only
	@scripts/fetch-models.sh
