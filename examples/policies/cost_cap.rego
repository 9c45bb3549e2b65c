# What one plan may commit, in dollars (the plan's `cost` object), and a warning on the daily cost.
package nimbus

import rego.v1

max_commit_dollars := 100

max_daily_dollars := 500

deny contains msg if {
	input.cost.committed > max_commit_dollars
	msg := sprintf("the plan commits about %d dollars, over the cap of %d", [round(input.cost.committed), max_commit_dollars])
}

warn contains msg if {
	input.cost.per_day > max_daily_dollars
	msg := sprintf("the fleet will cost about %d dollars a day", [round(input.cost.per_day)])
}
