module sonde.test/clients

go 1.26.0

require github.com/rabbitmq/amqp091-go v1.16.0

require (
	golang.org/x/net v0.60.0
	golang.org/x/text v0.42.0 // indirect
)
